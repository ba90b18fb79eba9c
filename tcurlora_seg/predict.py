"""Segment new scans with a trained run: NIfTI in, NIfTI masks on each input's grid (and affine) out.

Examples::

    python -m tcurlora_seg.predict run_dir=outputs/demo/tcurlora/2025-01-01_12-00-00 input=scan.nii.gz output=masks
    python -m tcurlora_seg.predict run_dir=RUN input=scans/ output=masks/ checkpoint=last min_component_mm3=1000
    python -m tcurlora_seg.predict input=scans/ output=masks/ suffix=""    # latest run; masks keep the scans' names

A folder input takes its .nii / .nii.gz files (not recursive); masks are <name>_seg.nii.gz (uint8).
Keys: configs/predict.yaml. Errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.cli import one_line_errors, run_entry
from tcurlora_seg.errors import UserError


@hydra.main(config_path="../configs", config_name="predict", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    for key in ("input", "output"):
        if OmegaConf.is_missing(cfg, key):
            raise UserError(f"{key} is not set: pass {key}=PATH (input: a .nii/.nii.gz file or a folder; output: a folder)")
    from tcurlora_seg.engine.predict import predict  # heavy imports (seconds) once the config is known to be valid
    from tcurlora_seg.engine.run import latest_run

    written = predict(
        cfg.run_dir if cfg.run_dir is not None else latest_run("outputs"),
        str(cfg.input),
        str(cfg.output),
        checkpoint=str(cfg.checkpoint),
        average_last=cfg.average_last,
        min_component_mm3=cfg.min_component_mm3,
        overlap=cfg.overlap,
        suffix=str(cfg.suffix),
        device=str(cfg.device),
        progress=bool(cfg.progress),
    )
    print(f"{len(written)} mask(s) written to {cfg.output}")


if __name__ == "__main__":
    run_entry(main)
