"""Test doubles of quantizers that live in repositories rather than packages, written from their published
formulas (same operations in the same order, so results match to float rounding), plus comparison helpers."""
