"""The handler tests' tiny bundle and small cases (one definition, shared)."""

from tests.handlers.conftest import AFFINE, SHAPE, TINY_NET, bundle, cases, tiny_bundle  # noqa: F401
