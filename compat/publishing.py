"""Sharing a trained model as TRL does: the model card TRL writes and the Hugging Face Hub upload.

Kept apart from the trainer because neither touches training: both read a saved folder and a few names.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Union

TAGS = ("trl", "iterative-sft", "jaxsft")


def model_card(
    base_model: Optional[str], model_name: Optional[str], dataset_name: Optional[str],
    tags: Union[str, Iterable[str], None], title: str,
) -> str:
    """The README.md text TRL's ``create_model_card`` writes (trainer "Iterative SFT"), naming jaxsft's versions.

    ``base_model``: the hub id the model came from, or None for a local folder or a model built here.
    """
    from huggingface_hub import ModelCardData

    tag_set = {tags} if isinstance(tags, str) else set(tags or ())
    tag_set.update(TAGS)
    if "JOB_ID" in os.environ:
        tag_set.add("hf_jobs")
    data = ModelCardData(
        base_model=base_model, datasets=dataset_name, library_name="transformers", model_name=model_name,
        tags=sorted(tag_set),
    )
    origin = f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})" if base_model else (
        "a fine-tuned model"
    )
    trained_on = f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset" if (
        dataset_name) else ""
    import flax
    import jax
    import torch
    import transformers

    import jaxsft

    return (
        f"---\n{data.to_yaml()}\n---\n\n# Model Card for {title}\n\n"
        f"This model is {origin}{trained_on}.\n"
        "It has been trained with Iterative SFT: jaxsft's TRL-compatible `IterativeSFTTrainer`, which runs "
        "TRL's IterativeSFTTrainer API on a JAX/Flax training core.\n\n"
        "## Training procedure\n\nThis model was trained with Iterative SFT (`step()` calls between "
        "generation and filtering).\n\n"
        "### Framework versions\n\n"
        f"- jaxsft: {jaxsft.__version__}\n- JAX: {jax.__version__}\n- Flax: {flax.__version__}\n"
        f"- Transformers: {transformers.__version__}\n- PyTorch: {torch.__version__}\n"
    )


def base_model_of(config: Any) -> Optional[str]:
    """The hub id a model was loaded from (``config._name_or_path``), None when it is a local folder or unset."""
    base_model = getattr(config, "_name_or_path", None) or None
    if base_model is not None and os.path.isdir(base_model):
        return None
    return base_model


def upload_folder(
    output_dir: str, repo_id: str, *, token: Optional[str], private: Optional[bool], commit_message: Optional[str],
    revision: Optional[str], blocking: bool,
) -> Any:
    """Upload a saved folder with ``HfApi().upload_folder``; offline or unreachable: ``ConnectionError`` saying
    where the files are and how to upload them later."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    saved = f"The model was saved to {output_dir}; upload it later with huggingface_hub.HfApi().upload_folder("
    saved += f"repo_id={repo_id!r}, folder_path={output_dir!r})."
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(
            f"push_to_hub: cannot upload to the Hugging Face Hub because offline mode is enabled "
            f"(HF_HUB_OFFLINE=1). {saved} Unset HF_HUB_OFFLINE to push."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        return api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, commit_message=commit_message, revision=revision,
            run_as_future=not blocking, ignore_patterns=["_*", "checkpoint-*"],
        )
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        raise ConnectionError(f"push_to_hub: uploading to {repo_id!r} failed: {err}. {saved}") from err

