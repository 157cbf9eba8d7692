"""The multiscale_language_modeling task: fairseq's language_modeling, aware of the model's pooling grid."""
import logging
from dataclasses import dataclass, field

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

logger = logging.getLogger(__name__)


@dataclass
class MultiscaleLanguageModelingConfig(LanguageModelingConfig):
    keep_samples_on_grid: bool = field(
        default=True,
        metadata={"help": "when training a multi-scale model, round --tokens-per-sample down to a multiple of its "
                          "coarsest block, so no compute is spent on internal padding"},
    )


@register_task("multiscale_language_modeling", dataclass=MultiscaleLanguageModelingConfig)
class MultiscaleLanguageModelingTask(LanguageModelingTask):
    """Language modeling whose training samples fit the model's grid (its coarsest block length).

    Model and task options are validated together when the model is built (MsformerLanguageModel.build_model),
    which fairseq-train does before the first update and before any checkpoint is written.
    """

    grid = 1

    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        decoder_grid = getattr(getattr(model, "decoder", None), "grid", None)
        if decoder_grid is not None:
            self.grid = decoder_grid.grid
            tokens = self.args.tokens_per_sample
            if not from_checkpoint and self.args.keep_samples_on_grid and tokens % self.grid:
                on_grid = tokens - tokens % self.grid
                logger.warning(
                    f"--tokens-per-sample {tokens} is not a multiple of the model's coarsest block ({self.grid}); "
                    f"training samples will hold {on_grid} tokens (--keep-samples-on-grid false keeps {tokens})"
                )
                self.args.tokens_per_sample = on_grid
        return model
