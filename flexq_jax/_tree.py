"""Small helpers for the model's nested dict/list parameter pytree."""

from __future__ import annotations

from typing import Any


def copy_containers(tree: Any) -> Any:
  """A copy of the dicts and lists of a nested tree; the leaves (arrays) are shared."""
  if isinstance(tree, dict):
    return {k: copy_containers(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [copy_containers(v) for v in tree]
  return tree


def get_at(tree: Any, index: tuple) -> Any:
  for key in index:
    tree = tree[key]
  return tree


def set_at(tree: Any, index: tuple, value: Any) -> None:
  """Sets tree[index[0]][index[1]]... = value in place (use on a copy_containers copy)."""
  get_at(tree, index[:-1])[index[-1]] = value


def path_str(keys) -> str:
  """"layers/3/q_proj" for a jax key path (dict keys and list indices joined by '/')."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
