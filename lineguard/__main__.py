from lineguard.cli import app

app(prog_name="lineguard")
