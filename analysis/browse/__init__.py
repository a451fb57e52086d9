"""The feature browser: a static HTML site of a scored run, in the style of Neuronpedia and SAEDashboard, that
opens from disk (no server). An index of the run's dictionaries with their key numbers; per dictionary a table
of its latents, sortable and filterable; per latent its explanation, scores with their sample sizes, firing,
activation histogram and example windows redrawn from the run's held-out cache; and a page with a binary and a
continuous coder side by side on the same held-out documents. `bae browse RUN` writes it (no Ray)."""

from analysis.browse.site import BrowseOptions, BrowseSummary, pairs, write_browser

__all__ = ["BrowseOptions", "BrowseSummary", "pairs", "write_browser"]
