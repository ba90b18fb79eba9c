"""Evaluate a training run: Dice (%) and HD95 (mm) per case on its test split, summary and predicted labels.

Examples::

    python -m tcurlora_seg.evaluate                                    # the most recent run under outputs/
    python -m tcurlora_seg.evaluate run_dir=outputs/demo/tcurlora/2025-01-01_12-00-00
    python -m tcurlora_seg.evaluate run_dir=RUN average_last=4 min_component_mm3=1000   # the paper's protocol
    python -m tcurlora_seg.evaluate run_dir=RUN checkpoint=last split=val overlap=0.25 device=cpu
    make eval RUN=outputs/demo/tcurlora/2025-01-01_12-00-00

Writes RUN/eval/metrics.csv, RUN/eval/summary.json and RUN/eval/predictions/<id>.nii.gz, prints a Markdown table.
Keys: configs/eval.yaml. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from tcurlora_seg.cli import one_line_errors, run_entry
from tcurlora_seg.errors import UserError


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    if cfg.run_dir is not None and not (Path(cfg.run_dir) / "config.yaml").is_file():  # before seconds of imports
        raise UserError(f"run_dir={cfg.run_dir}: no config.yaml; point run_dir at a folder written by tcurlora_seg.train")
    from tcurlora_seg.engine.evaluate import evaluate_run  # heavy imports (seconds) once the config is known to be valid
    from tcurlora_seg.engine.run import latest_run

    evaluate_run(
        cfg.run_dir if cfg.run_dir is not None else latest_run("outputs"),
        checkpoint=str(cfg.checkpoint),
        average_last=cfg.average_last,
        min_component_mm3=cfg.min_component_mm3,
        overlap=cfg.overlap,
        split=str(cfg.split),
        save_predictions=bool(cfg.save_predictions),
        device=str(cfg.device),
        progress=bool(cfg.progress),
    )


if __name__ == "__main__":
    run_entry(main)
