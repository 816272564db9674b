"""Graph passes, one file each, run in order by ``fxsearch.convert``'s pipeline."""
