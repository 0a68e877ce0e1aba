"""Bundled declarative nodes, installed as ``ddnlib.nodes``."""

__all__: list[str] = []
