"""Stage `download`: fetch the corpus named by data.url (or CHARLM_DATA_FILE) and verify its sha256."""

from pathlib import Path

import typer

from charlm.download import download
from charlm.errors import reported_errors
from charlm.params import load_params


def main(
    out: Path = typer.Option(..., help="Where the raw corpus goes."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file."),
) -> None:
    with reported_errors("download"):
        data = load_params(params).data
        download(data.url, out, data.sha256)


if __name__ == "__main__":
    typer.run(main)
