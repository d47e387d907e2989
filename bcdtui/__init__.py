"""bcdtui: the terminal workstation over recipes and run directories (it never imports training code).

Layers: `runner` (processes, slots, queue), `tailer` (incremental readers), `runs` (the runs table as data),
`diff` (recipe differences), `recipes` (validation, templates, launch plans), `workstation` (every UI action
as a plain method), `charts` (terminal charts as functions), then `widgets`, `screens` and `app` (Textual).
"""
