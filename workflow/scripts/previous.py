from _runner import run


def main(snakemake):
    """Replace results/{dataset}/previous/ by the finished results, only once the new copy is whole."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from scnbvi.outputs import atomic_output, current_umask, write_json

    def link_or_copy(source: Path, destination: Path) -> str:
        # A hard link costs no space and keeps its content when Snakemake replaces the result
        # (it deletes, then writes anew); a copy where the file system has no hard links.
        try:
            os.link(source, destination)
            return "linked"
        except OSError:
            with atomic_output(destination) as temporary:
                shutil.copy2(source, temporary)
            return "copied"

    results = Path(snakemake.params.results)
    kept = results / "previous"
    # Left by an interrupted copy; the results this job copies are complete and newer.
    for leftover in results.glob(".previous-*"):
        shutil.rmtree(leftover)
    staging = Path(tempfile.mkdtemp(prefix=".previous-new-", dir=results))
    # mkdtemp makes it private (0700); the kept results are as readable as the others.
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        files = {}
        for source in map(Path, snakemake.input):
            name = source.relative_to(results)
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            files[name.as_posix()] = link_or_copy(source, staging / name)
        (staging / "config.yaml").write_text(snakemake.params.config)
        if kept.exists():
            # Two renames on one file system: the old copy is never lost before the new one is whole.
            aside = Path(tempfile.mkdtemp(prefix=".previous-old-", dir=results))
            os.rename(kept, aside / "previous")
            os.rename(staging, kept)
            shutil.rmtree(aside)
        else:
            os.rename(staging, kept)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json({"directory": str(kept), "files": files, "config": "config.yaml"}, snakemake.output[0])


run(snakemake, main)
