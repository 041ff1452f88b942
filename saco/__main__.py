from saco.cli import app

app(prog_name="saco")
