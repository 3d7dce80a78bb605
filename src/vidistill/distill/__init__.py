"""Distillation methods: one file per method, each registering itself (see `base`)."""

from vidistill.distill.base import (
    DistillContext,
    Distiller,
    baseline_methods,
    create_distiller,
    get_method,
    list_methods,
    method_params,
    register_method,
    weighted_mean,
)

__all__ = ["DistillContext", "Distiller", "baseline_methods", "create_distiller", "get_method", "list_methods", "method_params",
           "register_method", "weighted_mean"]
