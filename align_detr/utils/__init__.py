# Copyright (c) align-detr contributors.
"""Small utilities shared by the data pipeline and the engine."""
