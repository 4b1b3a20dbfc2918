"""Integrations with model libraries. Import the submodule you need (``tokenweave.integrations.hf``);
nothing here imports those libraries eagerly."""
