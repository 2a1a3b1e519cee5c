"""The report: the paper's tables and four plots, from the files the stages left under `runs/`.

`runs` reads them, `rows` maps experiments to the paper's rows by their typed method, `tables`
formats one table per function, `plots` draws, and `build` puts the sections in order.
"""
