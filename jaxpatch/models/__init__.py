"""Model families. Each defines ``init_params`` and a pure ``forward`` over named sites."""
