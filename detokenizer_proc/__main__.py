from treadle.runtime.procs import run_child

run_child("treadle.detokenizer_proc.main")  # imported inside, so an import error reaches the client too
