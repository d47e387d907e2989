"""bcdtui: the terminal workstation over recipes and run directories (it never imports training code)."""
