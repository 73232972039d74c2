"""The `sdedit` command: a click group whose subcommands are imported only when used."""

from __future__ import annotations

import importlib
import os

import click

# OpenMP threads that spin while waiting turn a busy CPU machine into a 10x slowdown when the
# pipeline's CPU stages, or any other process, share the cores with torch (measured: 40 s vs
# 4 s for the same edit). Set before torch is imported; Ray's local workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> "module:attribute"; each module owns its command so heavy imports stay lazy.
SUBCOMMANDS = {
    "edit": "pipeline.edit_cli:edit",
    "run": "pipeline.run_cli:run",
    "bench": "pipeline.bench_cli:bench",
    "train": "pipeline.train_cli:train",
    "guides": "tasks.cli:guides",
    "manifest": "tasks.cli:manifest",
    "inspect": "tasks.cli:inspect",
    "evaluate": "tasks.cli:evaluate",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(SUBCOMMANDS) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return super().get_command(ctx, name)
        module_name, attribute = SUBCOMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            return None  # command not built yet in this checkout
        return getattr(module, attribute)

    def invoke(self, ctx: click.Context):
        """Run the subcommand; its error line never shows the credentials a URI carries."""
        try:
            return super().invoke(ctx)
        except click.ClickException as error:
            from sdedit.loading import redact

            error.message = redact(error.message)
            raise


@click.group(cls=LazyGroup)
@click.version_option(package_name="sdedit-pipeline")
def main() -> None:
    """Batch SDEdit: guided image synthesis and editing with diffusion priors."""
