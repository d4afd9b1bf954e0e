"""The bundled demo: a tiny class-conditional digits U-Net, a metric classifier, and the
`python -m fastdiff demo` command. Loading needs no network: the weights ship in
`fastdiff/assets/`."""
from fastdiff.demo.assets import load_classifier, load_digits_model, model_facts

__all__ = ["load_classifier", "load_digits_model", "model_facts"]
