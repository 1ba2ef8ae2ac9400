"""``clap-convert``: a released seed checkpoint -> a clapedge model directory.

    clap-convert paraspeechclap-combined.pth.tar --preset paraspeechclap -o models/psc
    clap-convert best.pth.tar --preset paraclap -o models/paraclap --tokenizer bert-tok/
    clap-convert ckpt.safetensors --config config.json -o out --force

User errors (bad file, wrong architecture, existing output) print the message and exit 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from clapedge.errors import ClapEdgeError, ConfigError
from clapedge.models.config import AUDIO_POOLINGS, ClapConfig
from clapedge.models.presets import PRESETS, build_preset


def _architecture(preset: str | None, config: Path | None, tiny: bool,
                  audio_pooling: str | None) -> ClapConfig:
    if (preset is None) == (config is None):
        raise ConfigError("give exactly one of --preset or --config")
    if config is not None:
        if tiny or audio_pooling:
            raise ConfigError("--tiny and --audio-pooling apply to --preset only")
        return ClapConfig.from_json_file(config)
    return build_preset(preset, tiny, audio_pooling=audio_pooling)


def convert(checkpoint: Path, output: Path, *, preset: str | None = None,
            config: Path | None = None, tiny: bool = False, audio_pooling: str | None = None,
            tokenizer: Path | None = None, force: bool = False) -> str:
    """Does the conversion; returns a one-paragraph summary. Raises ClapEdgeError subclasses."""
    # Imported here so `clap-convert --help` answers without loading torch.
    from clapedge.models.checkpoint import import_checkpoint
    from clapedge.models.clap import ClapModel
    from clapedge.models.presets import count_parameters

    if output.exists() and not force:
        raise ClapEdgeError(f"{output} already exists; pass --force to replace it")
    model = ClapModel.from_config(_architecture(preset, config, tiny, audio_pooling))
    report = import_checkpoint(model, checkpoint)
    if tokenizer is not None:
        model.attach_tokenizer(tokenizer)
    model.save_dir(output, overwrite=force)
    counts = count_parameters(model)
    return (f"{report.summary()}\nwrote {output} ({model.config.name}, "
            f"{counts.total / 1e6:.1f}M parameters)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Architecture of the checkpoint.")
@click.option("--config", "config", type=click.Path(path_type=Path),
              help="Architecture as a clapedge config.json (instead of --preset).")
@click.option("--tiny", is_flag=True, help="Use the preset's tiny test variant.")
@click.option("--audio-pooling", type=click.Choice(AUDIO_POOLINGS),
              help="Override the preset's audio pooling (e.g. 'mean' for pre-fix ParaSpeechCLAP).")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="HF tokenizer directory or tokenizer.json to carry into the output.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def main(checkpoint: Path, preset: str | None, config: Path | None, tiny: bool,
         audio_pooling: str | None, tokenizer: Path | None, output: Path, force: bool) -> None:
    """Convert a ParaSpeechCLAP / ParaCLAP style CHECKPOINT (.pth.tar or .safetensors)."""
    try:
        summary = convert(checkpoint, output, preset=preset, config=config, tiny=tiny,
                          audio_pooling=audio_pooling, tokenizer=tokenizer, force=force)
    except ClapEdgeError as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary)


if __name__ == "__main__":
    main()
