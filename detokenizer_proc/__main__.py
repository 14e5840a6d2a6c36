from treadle.runtime.procs import run_child
from treadle.detokenizer_proc.main import main

run_child(main)
