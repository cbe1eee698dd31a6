"""The command line: thin Typer commands that parse, call one library function and print."""
