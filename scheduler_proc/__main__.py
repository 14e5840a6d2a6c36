from treadle.runtime.procs import run_child
from treadle.scheduler_proc.main import main

run_child(main)
