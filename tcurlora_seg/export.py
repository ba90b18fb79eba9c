"""Export a trained run as a MONAI Bundle that runs with MONAI alone (the adapter merged into a plain UNETR).

Examples::

    python -m tcurlora_seg.export run_dir=outputs/demo/tcurlora/2025-01-01_12-00-00 out=bundles/necrosis
    python -m monai.bundle run --config_file bundles/necrosis/configs/inference.json \\
        --meta_file bundles/necrosis/configs/metadata.json --bundle_root bundles/necrosis \\
        --input_dir scans/ --output_dir masks/          # the masks of tcurlora_seg.predict, <stem>_seg.nii.gz
    python -m monai.bundle verify_net_in_out network_def --meta_file bundles/necrosis/configs/metadata.json \\
        --config_file bundles/necrosis/configs/inference.json

Keys: configs/export.yaml. Layout and what the bundle computes: ``engine/bundle.py``. Errors are one line on stderr
with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.cli import one_line_errors, run_entry
from tcurlora_seg.errors import UserError


@hydra.main(config_path="../configs", config_name="export", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "out"):
        raise UserError("out is not set: pass out=FOLDER for the bundle")
    if cfg.run_dir is not None and not (Path(cfg.run_dir) / "config.yaml").is_file():  # before seconds of imports
        raise UserError(f"run_dir={cfg.run_dir}: no config.yaml; point run_dir at a folder written by tcurlora_seg.train")
    from tcurlora_seg.engine.bundle import export_bundle  # heavy imports (seconds) once the config is known to be valid
    from tcurlora_seg.engine.run import latest_run

    export_bundle(cfg.run_dir if cfg.run_dir is not None else latest_run("outputs"), str(cfg.out),
                  checkpoint=str(cfg.checkpoint), overlap=cfg.overlap, version=str(cfg.version), authors=str(cfg.authors),
                  copyright=str(cfg.copyright), license=str(cfg.license))


if __name__ == "__main__":
    run_entry(main)
