import bisect
import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# YAML reads `123:` as a number and `on:`/`yes:` as True; the schema cannot see such keys.
for name in config["datasets"] if isinstance(config.get("datasets"), dict) else ():
    if not isinstance(name, str):
        quoted = '"on", as written' if name is None or isinstance(name, bool) else f'"{name}"'
        raise WorkflowError(
            f"config: datasets: {name} is not a valid data set name (a number, boolean or null in YAML, "
            f"which reads on/off/yes/no as booleans); fix: quote it ({quoted}) or rename it"
        )

# Keys given with --config replace whole sections; a user's config file replaces the
# built-in data sets, so a config naming only its own data sets fits only those.
try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as error:
    cause = error.__context__
    if not isinstance(cause, jsonschema.ValidationError):
        raise
    where = ".".join(str(part) for part in cause.absolute_path) or "(top level)"
    problem = cause.message
    if "propertyNames" in cause.schema_path:
        kind, becomes = (
            ("contrast", "de/{name}.tsv") if where.endswith(".contrasts") else ("data set", "results/{name}/")
        )
        problem = (
            f"{cause.instance!r} is not a valid {kind} name (it becomes {becomes}: use only "
            "A-Z a-z 0-9 _ . -, not only dots, at most 100 characters)"
        )
    raise WorkflowError(
        f"config: {where}: {problem}; fix: see config/README.md (every setting, its default and meaning)"
    ) from None

# The cluster profiles ship a placeholder account, which SLURM would reject job by job.
PLACEHOLDER_ACCOUNT = "myaccount"
DEFAULT_RESOURCES = workflow.resource_settings.default_resources  # None without --default-resources
if f"slurm_account={PLACEHOLDER_ACCOUNT}" in (
    arg.replace('"', "").replace("'", "") for arg in getattr(DEFAULT_RESOURCES, "args", None) or ()
):
    raise WorkflowError(
        f"slurm_account is still the placeholder {PLACEHOLDER_ACCOUNT!r}; fix: set your SLURM account (and "
        "partition) in the default-resources block of profiles/slurm/config.yaml (profiles/slurm-gpu/config.yaml "
        "for --profile slurm-gpu)"
    )

# Every rule that runs the package has `code=CODE_VERSION` among its params, so an edit of the
# package (not only of a rule's script) reruns the jobs that depend on it.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
# Only modules of the standard library: Snakemake's own process needs no numpy or pandas.
from scnbvi import __version__ as scnbvi_version
from scnbvi.naming import contrast_name
from scnbvi.outputs import source_hash
from scnbvi.run_report import run_report

CODE_VERSION = f"{scnbvi_version}+{source_hash()}"


DATASETS = sorted(config["datasets"])
RESULTS = "results"
# Logs written after this are this run's: onerror repeats their one-line errors.
RUN_STARTED = time.time()


def failed_jobs_errors():
    """The one-line errors of this run's failed jobs, from their logs, oldest first."""
    logs = [path for path in Path(RESULTS).glob("*/logs/**/*.log") if path.stat().st_mtime >= RUN_STARTED]
    lines = []
    for path in sorted(logs, key=lambda path: path.stat().st_mtime):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("scnbvi error in rule"):
                lines.append(line)
            elif " ERROR unexpected error in rule" in line:
                lines.append(f"scnbvi: {line.split(' ERROR ', 1)[1]}; traceback in {path}")
    return list(dict.fromkeys(lines))


def has_design(settings):
    """Whether a data set read from a file names design columns or contrasts: what the preflight checks."""
    design = settings["design"]
    terms = design["categorical"] or design["continuous"] or design.get("random")
    return bool(settings.get("path")) and bool(terms or settings["contrasts"])


def design_errors():
    """Each data set's design and contrasts checked against the obs of its input before any job runs,
    by scnbvi.preflight in a python of its own (this process imports no numpy or pandas): its one-line
    errors. A check that cannot run is only a warning: the covariates rule checks the same."""
    if not any(has_design(config["datasets"][name]) for name in DATASETS):
        return []  # nothing to check: no python of its own to start
    source = os.pathsep.join(filter(None, (str(Path(workflow.basedir) / "src"), os.environ.get("PYTHONPATH"))))
    result = subprocess.run(
        [sys.executable, "-m", "scnbvi.preflight"],
        input=json.dumps(config, default=str),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": source},
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("scnbvi error")]
    if result.returncode and not errors:
        cause = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        print(
            f"scnbvi: the design was not checked before the run ({cause}); the covariates rule checks it",
            file=sys.stderr,
        )
    return errors


# Names may hold regex characters (a "." in "v1.0" would match any character).
wildcard_constraints:
    dataset="|".join(re.escape(name) for name in DATASETS) if DATASETS else "no-dataset",
    contrast="[A-Za-z0-9_.-]+",


def dataset_config(wildcards):
    return config["datasets"][wildcards.dataset]


# Inference settings that cannot change the numbers, only how a fit runs: kept out of the rules'
# params (a change would rerun the fit and everything after it); the fit reads them from the config.
RUN_ONLY_INFERENCE_SETTINGS = ("checkpoint_minutes", "memory_limit_gb", "stream_above_gb")


def section(name, leave_out=()):
    """A params function giving one config section of the job's data set, without ``leave_out``."""

    def get(wildcards):
        return {
            key: copy.deepcopy(value) for key, value in dataset_config(wildcards)[name].items() if key not in leave_out
        }

    return get


def input_h5ad(wildcards):
    path = dataset_config(wildcards).get("path")
    return path if path else f"{RESULTS}/{wildcards.dataset}/simulated.h5ad"


def counts_reading(wildcards):
    """The load settings that say how the counts are read: the rules that read them from the input
    through selection.h5ad take these as params, so that a change reruns them."""
    load = dataset_config(wildcards)["load"]
    return {key: load[key] for key in ("layer", "duplicate_names")}


def input_files(path):
    """The files an input is stored in: the .h5ad file, or every file of a zarr store's directory, in
    a fixed order."""
    if os.path.isdir(path):
        return sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    return [path]


def input_identity(wildcards):
    """The input's size and a hash of 64 evenly spaced 64 KiB pieces of it (4 MiB read at most):
    a file replaced by other counts with an older modification time (cp -p, rsync -t, a restore
    from backup) still reruns load. A zarr store is read as its files one after the other, and
    their names and sizes are hashed too: Snakemake sees only its directory's modification time,
    which a rewritten chunk leaves as it was. The simulated data set is made by the workflow: no
    identity."""
    path = dataset_config(wildcards).get("path")
    if not path or not os.path.exists(path):
        return ""
    files = input_files(path)
    sizes = [os.path.getsize(name) for name in files]
    size = sum(sizes)
    digest = hashlib.sha256(str(size).encode())
    if os.path.isdir(path):
        for name, file_size in zip(files, sizes):
            digest.update(f"{os.path.relpath(name, path)} {file_size}\n".encode())
    ends = list(itertools.accumulate(sizes))
    piece = 1 << 16
    for index in range(64):
        offset = index * max(size - piece, 0) // 63
        which = bisect.bisect_right(ends, offset)  # the file holding byte `offset` of them all
        if which == len(files):
            break  # no bytes at all
        with open(files[which], "rb") as file:
            file.seek(offset - (ends[which] - sizes[which]))
            digest.update(file.read(piece))
    return f"{size} bytes, sha256 of 64 pieces {digest.hexdigest()[:16]}"


def covariate_files(wildcards):
    lengths = dataset_config(wildcards)["covariates"]["gene_length"]
    if lengths["source"] in ("table", "gtf"):
        if not lengths.get("path"):
            raise WorkflowError(
                f"config: datasets.{wildcards.dataset}.covariates.gene_length.path: missing; "
                f"fix: give the {lengths['source']} file, or set source: impute"
            )
        return [lengths["path"]]
    return []


def input_mb(input):
    return sum(os.path.getsize(name) for f in input if os.path.exists(f) for name in input_files(f)) / 1e6


def scaled_mem_mb(base_mb, per_input_mb):
    """Memory that grows with the input file size and with each retry."""

    def mem_mb(wildcards, input, attempt):
        return int((base_mb + per_input_mb * input_mb(input)) * attempt)

    return mem_mb


def scaled_runtime(base_minutes, minutes_per_gb):
    """Wall time in minutes that grows with the input file size and with each retry."""

    def runtime(wildcards, input, attempt):
        return int((base_minutes + minutes_per_gb * input_mb(input) / 1000) * attempt)

    return runtime


def slice_mem_mb(wildcards, input, attempt):
    """Highly variable genes are ranked on the selected cells' counts at once; every other selection
    reads at most a block of cells at a time."""
    if dataset_config(wildcards)["slice"]["genes"]["method"] == "hvg":
        return scaled_mem_mb(1000, 6)(wildcards, input, attempt)
    return scaled_mem_mb(3000, 0)(wildcards, input, attempt)


def streamed_mem_mb(base_mb, per_input_mb):
    """Memory for a job that reads the selected counts as the fit does (scnbvi.cell_rows.selected_counts).
    It grows with the input up to what is held when the counts are streamed (at most
    inference.stream_above_gb of them; larger ones stay on disk), and with each retry."""

    def mem_mb(wildcards, input, attempt):
        stream_above_mb = dataset_config(wildcards)["inference"]["stream_above_gb"] * 1000
        return int((base_mb + min(per_input_mb * input_mb(input), 3 * stream_above_mb)) * attempt)

    return mem_mb


def mem_mb_besides_counts(base_mb, per_input_mb):
    """Memory for a job that reads only a few cells of the input (its other inputs set the size)."""

    def mem_mb(wildcards, input, attempt):
        others = [name for name in input if name != input.h5ad]
        return int((base_mb + per_input_mb * input_mb(others)) * attempt)

    return mem_mb


def fit_runtime(wildcards, input, attempt):
    """Minutes: an upper bound from max_iterations (a generous 20 ms/step) and the input size."""
    iterations = dataset_config(wildcards)["inference"]["max_iterations"]
    return scaled_runtime(15 + iterations * 0.02 / 60, 30)(wildcards, input, attempt)


def gene_symbols(wildcards):
    """The var column of the data set's gene symbols (load.gene_symbols), or None."""
    return dataset_config(wildcards)["load"]["gene_symbols"]


def contrast_files(dataset, name):
    """The files of a contrast under de/; the PyDESeq2 cross-check's only with design.random."""
    settings = config["datasets"][dataset]
    pseudobulk = settings["design"]["random"] and settings["de"]["pseudobulk"]
    files = [f"{name}{suffix}" for suffix in (".tsv", ".html", "_ma.png", "_volcano.png")]
    return files + [f"pseudobulk/{name}{suffix}" for suffix in (".tsv", "_agreement.tsv") if pseudobulk]


def contrasts(dataset):
    """The data set's contrasts by file name: name -> [column, numerator, denominator]. Names are the
    keys of a mapping, or made file-safe from the parts of a list's contrasts. Two whose files would
    overwrite each other stop the run before any job (rule all's targets call this)."""
    given = config["datasets"][dataset]["contrasts"]
    pairs = given.items() if isinstance(given, dict) else ((None, parts) for parts in given)
    named, owners = {}, {}
    for name, parts in pairs:
        parts = [str(part) for part in parts]
        name = contrast_name(*parts) if name is None else name
        if name in named and named[name] == parts:
            continue
        for path in contrast_files(dataset, name):
            if path in owners:
                raise WorkflowError(
                    f"config: datasets.{dataset}.contrasts: {owners[path]} and {name} {parts} would both write "
                    f"de/{path}; fix: name them apart (contrasts: {{name: [column, numerator, denominator]}}), "
                    "or drop one"
                )
            owners[path] = f"{name} {parts}"
        named[name] = parts
    return named


def configured_contrasts(wildcards):
    """The data set's contrasts as written in the config, [column, numerator, denominator] each."""
    given = dataset_config(wildcards)["contrasts"]
    return copy.deepcopy(list(given.values()) if isinstance(given, dict) else given)


def contrast_of(wildcards):
    return contrasts(wildcards.dataset)[wildcards.contrast]


def nuts_section(wildcards):
    """The data set's check.nuts section; the check_nuts rule runs only for data sets that have one."""
    check = dataset_config(wildcards)["check"]
    if "nuts" not in check:
        raise WorkflowError(
            f"config: datasets.{wildcards.dataset}.check.nuts: missing; "
            "fix: add check: {nuts: {}} to the data set to compare ADVI with NUTS"
        )
    return copy.deepcopy(check["nuts"])


def nuts_runtime(wildcards, input, attempt):
    """Minutes: the ADVI fit's bound plus a generous 1 ms per NUTS iteration and 1,000 entries."""
    nuts = nuts_section(wildcards)
    iterations = nuts["chains"] * (nuts["tune"] + nuts["draws"])
    return fit_runtime(wildcards, input, attempt) + int(iterations * nuts["cells"] * nuts["genes"] / 6e7 * attempt)


def dataset_results(dataset):
    """Every result of the data set, but not previous/: the copy is taken once all of these exist."""
    fit = ("trace.nc", "summary.csv", "genes.tsv", "cells.tsv", "scnbvi.h5ad", "elbo.tsv", "elbo.png")
    ppc = (
        "ppc_genes.tsv",
        "ppc_cells.tsv",
        "ppc.json",
        "ppc_zero_fraction.png",
        "ppc_mean_variance.png",
        "ppc_library_size.png",
    )
    outputs = [f"{RESULTS}/{dataset}/{name}" for name in fit + ppc]
    settings = config["datasets"][dataset]
    if "nuts" in settings["check"]:
        outputs += [f"{RESULTS}/{dataset}/check_nuts.{suffix}" for suffix in ("tsv", "json", "png")]
    for name in contrasts(dataset):
        outputs += [f"{RESULTS}/{dataset}/de/{path}" for path in contrast_files(dataset, name)]
    return outputs


def all_outputs():
    """The results of every data set, and the copy of them that a failed rerun leaves in place."""
    return [path for d in DATASETS for path in (*dataset_results(d), f"{RESULTS}/{d}/previous.json")]
