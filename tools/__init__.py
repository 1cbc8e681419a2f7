"""Host tools: the ``nvcim`` command, datasets, training and the TSB workflow."""
