"""lm-eval task definitions for the local task files.

Each ``come_fast_<task>.yaml`` here is lm-evaluation-harness 0.4.13's stock
task (``piqa``, ``hellaswag``, ``winogrande``, ``arc_easy``, ``arc_challenge``,
``boolq``, ``openbookqa``) with its prompt, target, choices and metrics
unchanged (``tests/test_lmeval.py`` compares them with the installed stock
YAMLs) and only the data source replaced: ``custom_dataset`` points at a loader
below, which reads the local file and returns the rows of the Hugging Face
dataset the stock task downloads. Functions of the stock tasks (HellaSwag's
``process_docs``, WinoGrande's ``doc_to_*``) are lm-eval's own (HellaSwag's
memoized: lm-eval runs it on every access to the documents, five times per
evaluation at 3 s each).

Use with stock lm-eval::

    lm_eval --model hf --model_args pretrained=DIR --tasks come_fast_piqa \\
        --include_path "$(python -c 'import come_fast.eval.lm_eval_tasks as t; print(t.TASKS_DIR)')" \\
        --metadata '{"data_dir": "/path/to/shared/data"}'

or through ``python -m come_fast.eval.lmeval`` (adds the include path and
registers the ``come_fast`` model). The tag ``come_fast_zeroshot`` runs all
seven. The data folder is the ``data_dir`` metadata entry, else the one
``come_fast.eval.default_data_dir()`` names.
"""
from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

# our task name -> (lm-eval task name, split the local rows become)
LM_EVAL_TASKS = {
    "piqa": ("come_fast_piqa", "validation"),
    "hellaswag": ("come_fast_hellaswag", "validation"),
    "winogrande": ("come_fast_winogrande", "validation"),
    "arc_easy": ("come_fast_arc_easy", "test"),
    "arc_challenge": ("come_fast_arc_challenge", "test"),
    "boolq": ("come_fast_boolq", "validation"),
    "openbookqa": ("come_fast_openbookqa", "test"),
}
TAG = "come_fast_zeroshot"


def _data_dir(data_dir=None) -> Path:
    if data_dir is None:
        from .. import default_data_dir

        data_dir = default_data_dir()
    return Path(data_dir)


def load_rows(task: str, data_dir=None):
    """``datasets.DatasetDict`` with the task's local rows under its split."""
    import datasets

    from ..tasks import check_files, get_task

    path = _data_dir(data_dir)
    try:
        check_files(task, path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the data folder comes from lm_eval's --metadata '{{\"data_dir\": \"...\"}}', "
                                "TaskManager(metadata={'data_dir': ...}) or $COME_FAST_DATA_DIR)") from None
    return datasets.DatasetDict({LM_EVAL_TASKS[task][1]: datasets.Dataset.from_list(get_task(task).load(path))})


# custom_dataset hooks: lm-eval calls them with the task's metadata (version,
# config_source, what --metadata / TaskManager(metadata=) adds, the model args
# when simple_evaluate builds the task manager) as keyword arguments.
def _loader(task: str):
    def load(data_dir=None, **_):
        return load_rows(task, data_dir)

    load.__name__ = load.__qualname__ = f"load_{task}"
    return load


load_piqa = _loader("piqa")
load_hellaswag = _loader("hellaswag")
load_winogrande = _loader("winogrande")
load_arc_easy = _loader("arc_easy")
load_arc_challenge = _loader("arc_challenge")
load_boolq = _loader("boolq")
load_openbookqa = _loader("openbookqa")


_PROCESSED: dict = {}


def hellaswag_process_docs(dataset):
    """lm-eval's stock HellaSwag ``process_docs``, memoized per dataset."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    key = getattr(dataset, "_fingerprint", None)
    if key is None:
        return process_docs(dataset)
    if key not in _PROCESSED:
        while len(_PROCESSED) >= 2:
            _PROCESSED.pop(next(iter(_PROCESSED)))
        _PROCESSED[key] = process_docs(dataset)
    return _PROCESSED[key]
