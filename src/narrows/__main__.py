from narrows.cli import run

run()
