from treadle.runtime.procs import run_child
from treadle.gpu_worker.main import main

run_child(main)
