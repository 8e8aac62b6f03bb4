"""Hub card templates (``hub_cards/*.md``): a YAML front matter of static metadata, then a Jinja body.

A template's front matter holds what never changes for that card (``license``, ``tags``, ``datasets``,
``pipeline_tag``); the code that renders it adds what it computes (the model-index of measured metrics, a dataset's
size category) and writes the result as the card's YAML, as `huggingface_hub.RepoCard.from_template` does with
``{{ card_data }}``. A front matter that is just ``{{ card_data }}`` (huggingface_hub's own style) adds nothing.

Templates render with `jinja2.StrictUndefined`: a variable the code does not pass is an error, not an empty string.
"""

from __future__ import annotations

from pathlib import Path

CARD_DATA_PLACEHOLDER = "{{ card_data }}"
# Keys a template must not hold: metric numbers come only from measurements passed in when the card is rendered.
COMPUTED_KEYS = ("model-index", "eval_results")


def read_card_template(path: str | Path) -> tuple[dict, str]:
    """``(static metadata, Jinja body)`` of a card template; a clear error for a missing or malformed one."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} not found")
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError(f"card template {path}: the YAML front matter opened by '---' on line 1 is never closed")
    front, body = text[4:end], text[end + len("\n---\n"):]
    if front.strip() == CARD_DATA_PLACEHOLDER:
        return {}, body
    try:
        metadata = yaml.safe_load(front) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"card template {path}: the front matter is not valid YAML ({error})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"card template {path}: the front matter must be a YAML mapping, "
                         f"got {type(metadata).__name__}")
    computed = [key for key in COMPUTED_KEYS if key in metadata]
    if computed:
        raise ValueError(f"card template {path} holds {computed}: metric values are filled in from measurements "
                         "when the card is rendered (--card_metrics), never written into a template")
    return metadata, body


def merge_tags(*groups) -> list[str]:
    """Tags of every group, first occurrence kept, in order."""
    tags: list[str] = []
    for group in groups:
        for tag in group or ():
            if tag not in tags:
                tags.append(str(tag))
    return tags


def render_card(card_class, card_data, body: str, context: dict, template: str | Path = "<template>"):
    """``card_class`` (`ModelCard` / `DatasetCard`) with ``card_data`` as YAML and ``body`` rendered with ``context``.

    ``{% include "_name.md" %}`` reads partials from the template's folder (``hub_cards/_evaluation_results.md``).
    """
    import jinja2

    folder = Path(template).parent if Path(template).is_file() else None
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     loader=jinja2.FileSystemLoader(str(folder)) if folder else None)
    try:
        text = environment.from_string(body).render(**context)
    except jinja2.TemplateError as error:
        raise ValueError(f"card template {template} does not render: {error}") from error
    return card_class(f"---\n{card_data.to_yaml()}\n---\n{text}")


__all__ = ["merge_tags", "read_card_template", "render_card"]
