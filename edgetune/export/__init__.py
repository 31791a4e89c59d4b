"""edgetune export: the fine-tuning loop as a self-contained C project for a board or a
microcontroller.

The project holds the compiled engine's own C sources (copied from this package), the model
as ``const`` arrays, one static arena sized by edgetune's memory model
(``edgetune.memory.plan_device_memory``), a device API and an example program with its
Makefile. See docs/export.md.

    from edgetune.export import ExportOptions, export_project
    export_project(ExportOptions(model="model", method="skip2-lora", target="host", out="dev",
                                 task="damage1", data_dir="../shared/data"))
"""
from .project import ExportOptions, ExportResult, check_out, export_project, plan_export
from .targets import TARGETS, Target, ToolchainError, get_target

__all__ = ["ExportOptions", "ExportResult", "check_out", "export_project", "plan_export", "TARGETS", "Target",
           "ToolchainError", "get_target"]
