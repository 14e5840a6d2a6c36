from treadle.runtime.procs import run_child
from treadle.gpu_worker.worker_proc import main

run_child(main)
