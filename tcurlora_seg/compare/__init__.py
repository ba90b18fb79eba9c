"""``scripts/compare.py`` by job: ``sweeps`` runs them, ``collect`` turns run folders into rows, ``tables`` writes the
CSVs and Markdown tables, ``figures`` the plots; ``constants`` holds what is compared and the tables' layout."""
