"""xmodal: cross-modal (text <-> image) search over your photos and captions.

The packages, lowest layer first: ``xmodal.crossmodal`` (the model layer),
``xmodal.indexer`` (folders and captions into an index bundle), ``xmodal.search``
(queries over a bundle), ``xmodal.web`` (pages and the JSON API), ``xmodal.training``
(training and the demo corpus), and the command line, ``xmodal.cli`` (``main``).
"""

from xmodal.crossmodal.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {"main": "cli"})
