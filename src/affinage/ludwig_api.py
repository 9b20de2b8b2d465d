"""Seed 000's Python API, ``LudwigModel``, as a thin layer over :mod:`affinage.api`.

    from affinage import LudwigModel
    model = LudwigModel(config)                                   # a dict, a YAML path or a YAML string
    train_stats, preprocessed_data, output_directory = model.train(dataset="ludwig://alpaca")
    model.save("results")
    model = LudwigModel.load("results")
    predictions, _ = model.predict(df)                            # column <output feature>_response
    LudwigModel.upload_to_hf_hub("you/model", "results/api_experiment_run")

Why a second API: a Ludwig user's code runs as written. Everything here is affinage's own
``train`` / ``load_run`` / ``Run`` and the Hub push; this module only translates arguments and
return values to Ludwig's shapes (``ludwig/api.py``). Datasets take Ludwig's forms
(:mod:`affinage.data.sources`): a file, ``hf://ID[--SUBSET]``, ``ludwig://alpaca``, a DataFrame.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from affinage.api import Run, load_run, resolve_config
from affinage.api import train as affinage_train
from affinage.config import Config, config_from_dict, config_to_dict, load_config
from affinage.data import feature_fields
from affinage.data.sources import data_section
from affinage.errors import AffinageError, ConfigError
from affinage.ludwig_results import (
    TrainingResults,
    as_table,
    evaluation_file,
    find_run,
    inference_rows,
    new_output_directory,
    preprocessed_data,
    training_stats,
)

# Ludwig arguments that change nothing in affinage (it always saves the run, reads a file's format
# from its name, and predicts every row): accepted so that Ludwig code runs unchanged.
NO_EFFECT = {
    "train": {
        "data_format",
        "training_set_metadata",
        "skip_save_training_description",
        "skip_save_training_statistics",
        "skip_save_model",
        "skip_save_progress",
        "skip_save_log",
        "skip_save_processed_input",
    },
    "predict": {"data_format", "batch_size", "skip_save_unprocessed_output", "skip_save_predictions"},
    "evaluate": {
        "data_format",
        "batch_size",
        "skip_save_unprocessed_output",
        "skip_save_predictions",
        "skip_save_eval_stats",
        "collect_overall_stats",
    },
}


class LudwigModel:
    """Ludwig's ``LudwigModel`` on affinage: train, predict, evaluate, save, load, upload to the Hub."""

    def __init__(
        self,
        config: str | Path | dict[str, Any] | Config,
        logging_level: int = logging.ERROR,
        backend: Any = None,
        gpus: str | int | list[int] | None = None,
        gpu_memory_limit: float | None = None,
        allow_parallel_threads: bool = True,
        callbacks: list[Any] | None = None,
        *,
        device: str | None = None,
        **kwargs: Any,
    ):
        # allow_parallel_threads is accepted as Ludwig takes it: affinage's threads are AFFINAGE_THREADS's.
        # Seed 000 spells logging_level in French (`niveau_de_journalisation`): its code runs as written.
        logging_level = kwargs.pop("niveau_de_journalisation", logging_level)
        _no_other_arguments(kwargs, "LudwigModel")
        if backend not in (None, "local") and not (isinstance(backend, dict) and backend.get("type") == "local"):
            raise ConfigError(
                f"backend {backend!r} is not supported",
                where="LudwigModel(backend=)",
                fix="remove it: affinage trains in this process (several processes: torchrun, see docs/reliability.md)",
            )
        if gpu_memory_limit is not None or callbacks:
            name = "gpu_memory_limit" if gpu_memory_limit is not None else "callbacks"
            raise ConfigError(
                f"{name} is not supported",
                where=f"LudwigModel({name}=)",
                fix="remove it (trainer.report_to logs to TensorBoard, W&B or MLflow)",
            )
        self.config_obj = read_config(config)
        self.device = device or _device_of(gpus)
        self.progress = logging_level <= logging.INFO
        self.run: Run | None = None

    def __repr__(self) -> str:
        return f"LudwigModel(run={str(self.run.path) if self.run else None!r})"

    @property
    def config(self) -> dict[str, Any]:
        """The config as a dict (Ludwig's ``model.config``)."""
        return config_to_dict(self.config_obj)

    def train(
        self,
        dataset: Any = None,
        training_set: Any = None,
        validation_set: Any = None,
        test_set: Any = None,
        *,
        experiment_name: str = "api_experiment",
        model_name: str = "run",
        model_resume_path: str | Path | None = None,
        output_directory: str | Path = "results",
        random_seed: int | None = None,
        compare_base: bool = True,
        **kwargs: Any,
    ) -> TrainingResults:
        """Fine-tune into ``output_directory/<experiment_name>_<model_name>[_N]`` (a new folder, as Ludwig does).

        ``model_resume_path``, an existing run folder, continues or re-opens that run instead.
        ``compare_base`` (affinage's) also measures the base model on the test split first.
        """
        _no_other_arguments(kwargs, "train", NO_EFFECT["train"])
        section = data_section(dataset, training_set, validation_set, test_set)  # checked: fails before any model
        if not section and not (self.config_obj.data.dataset or self.config_obj.data.train):
            raise AffinageError(
                "no dataset to train on",
                where="LudwigModel.train",
                fix="pass dataset= (a file, a DataFrame, "
                "hf://ID or ludwig://alpaca), or training_set= (+ validation_set=, test_set=)",
            )
        overrides: dict[str, Any] = {"data": section} if section else {}
        if random_seed is not None:
            overrides["trainer"] = {"seed": random_seed}
        if model_resume_path is not None and Path(model_resume_path).is_dir():
            output = Path(model_resume_path)
        else:
            output = new_output_directory(output_directory, experiment_name, model_name)
        self.run = affinage_train(
            self.config_obj, output, progress=self.progress, compare_base=compare_base, device=self.device, **overrides
        )
        self.config_obj = self.run.config
        return TrainingResults(
            training_stats(self.run, self.output_feature), preprocessed_data(self.run), str(self.run.path)
        )

    def predict(
        self,
        dataset: Any = None,
        *,
        split: str = "full",
        generation_config: dict[str, Any] | None = None,
        output_directory: str | Path = "results",
        return_type: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, str]:
        """``(predictions, output_directory)``: one row per input, column ``<output feature>_response``.

        ``dataset``: a DataFrame, a list of rows or prompts, a dict of columns, a data file or a
        reference. ``generation_config`` takes ``max_new_tokens``; the run's ``generation`` does the rest.
        """
        _no_other_arguments(kwargs, "predict", NO_EFFECT["predict"])
        run = self._trained("predict")
        _full_split_only(split)
        extra = set(generation_config or {}) - {"max_new_tokens"}
        if extra:
            raise ConfigError(
                f"generation_config keys {sorted(extra)} are not taken per call",
                where="predict(generation_config=)",
                fix="set them in the config's generation section (temperature, top_p, max_new_tokens)",
            )
        rows = inference_rows(dataset)
        outputs = run.predict(rows, max_new_tokens=(generation_config or {}).get("max_new_tokens"))
        name = self.output_feature
        columns = {f"{name}_predictions": outputs, f"{name}_response": outputs}
        return as_table(columns, return_type), str(output_directory)

    def evaluate(
        self,
        dataset: Any = None,
        *,
        split: str = "full",
        collect_predictions: bool = False,
        output_directory: str | Path = "results",
        return_type: Any = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], Any, str]:
        """``(eval_stats, predictions, output_directory)``; eval_stats: ``{feature: metrics, "combined": {loss}}``.

        ``dataset`` defaults to the run's test split; ``predictions`` is None unless ``collect_predictions``.
        """
        _no_other_arguments(kwargs, "evaluate", NO_EFFECT["evaluate"])
        run = self._trained("evaluate")
        _full_split_only(split)
        metrics = dict(run.evaluate(None if dataset is None else evaluation_file(dataset)))
        rows = metrics.pop("predictions", None) or []
        name = self.output_feature
        stats = {name: metrics, "combined": {"loss": metrics.get("loss")}}
        predictions = None
        if collect_predictions:
            renamed = {"gold": name, "predicted": f"{name}_predictions", "output": f"{name}_predictions"}
            records = [{renamed.get(key, key): value for key, value in row.items()} for row in rows]
            for record in records:
                record[f"{name}_response"] = record.get(f"{name}_predictions")
            keys = list(dict.fromkeys(key for record in records for key in record))
            predictions = as_table({key: [record.get(key) for record in records] for key in keys}, return_type)
        return stats, predictions, str(output_directory)

    def save(self, save_path: str | Path) -> None:
        """Write the trained run (config, adapter, splits, results) to ``save_path``; ``load`` opens it."""
        self._trained("save").directory.save_copy(save_path)

    @classmethod
    def load(
        cls, model_dir: str | Path, logging_level: int = logging.ERROR, *, device: str | None = None, **kwargs: Any
    ) -> LudwigModel:
        """A model trained (``train``'s folder) or saved (``save``'s folder) before, ready to predict."""
        run = load_run(find_run(model_dir, "LudwigModel.load(model_dir=)"))
        model = cls(run.config, logging_level=logging_level, device=device, **kwargs)
        model.run = run
        return model

    @staticmethod
    def upload_to_hf_hub(
        repo_id: str,
        model_path: str | Path,
        repo_type: str = "model",
        private: bool = False,
        commit_message: str | None = None,
        commit_description: str | None = None,
        *,
        what: str = "adapter",
        dry_run: bool = False,
    ) -> bool:
        """Push the run at ``model_path`` to the Hub: the adapter (``what``: merged, gguf) and its model card."""
        upload_run(
            repo_id,
            model_path,
            repo_type=repo_type,
            private=private,
            commit_message=commit_message,
            commit_description=commit_description,
            what=what,
            dry_run=dry_run,
        )
        return True

    @property
    def output_feature(self) -> str:
        """The output feature's name, the prefix of the prediction columns (``output`` when the data decides)."""
        return feature_fields(self.config_obj)[1] or "output"

    def _trained(self, action: str) -> Run:
        if self.run is None:
            raise AffinageError(
                f"nothing to {action}: this model is not trained",
                fix="call model.train(dataset=...) first, or LudwigModel.load(folder) a trained one",
            )
        return self.run


def read_config(config: str | Path | dict[str, Any] | Config) -> Config:
    """A dict, a Config, a YAML file path or (as Ludwig's docs show) a YAML string, validated now."""
    if isinstance(config, (dict, Config)):
        return resolve_config(config, {})
    text = str(config)
    if isinstance(config, str) and ("\n" in text or ": " in text) and not Path(text).is_file():
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML: {error}", where="the config string", fix="fix its indentation") from None
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a mapping", where="the config string", fix="write key: value lines")
        return config_from_dict(raw, source="the config string", base_dir=Path.cwd())
    return load_config(text)


def upload_run(
    repo_id: str,
    model_path: str | Path,
    *,
    repo_type: str = "model",
    private: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    what: str = "adapter",
    dry_run: bool = False,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``Run.push`` of the run at ``model_path``, with Ludwig's arguments; ``names`` spells them in errors."""
    names = names or {"repo_type": "repo_type=", "model_path": "model_path="}
    if repo_type not in (None, "model"):
        raise AffinageError(
            f"repo_type {repo_type!r}: affinage uploads a model", where=names["repo_type"], fix="use repo_type model"
        )
    run = load_run(find_run(model_path, names["model_path"]))
    return run.push(
        repo_id,
        what,
        private=private,
        dry_run=dry_run,
        commit_message=commit_message,
        commit_description=commit_description,
    )


def _device_of(gpus: str | int | list[int] | None) -> str | None:
    """Ludwig's ``gpus`` (CUDA_VISIBLE_DEVICES syntax) as a device: None picks CUDA when present."""
    if gpus is None:
        return None
    first = gpus[0] if isinstance(gpus, list) and gpus else gpus
    if first in ([], "", -1, "-1"):
        return "cpu"
    return f"cuda:{str(first).split(',')[0].strip()}"


def _full_split_only(split: str) -> None:
    if split != "full":
        raise ConfigError(
            f"split {split!r}: affinage predicts every row given", where="split=", fix="pass only the rows to use"
        )


def _no_other_arguments(kwargs: dict[str, Any], call: str, no_effect: set[str] | frozenset[str] = frozenset()) -> None:
    unknown = sorted(set(kwargs) - no_effect)
    if unknown:
        raise ConfigError(
            f"{call}() got unexpected arguments: {', '.join(unknown)}",
            where=f"{call}()",
            fix="see docs/ludwig.md for the arguments LudwigModel takes",
        )
