"""What runs after training to report on it, from the MLflow store and the files its runs point to.

* :mod:`.grid` -- run the rows of a results grid (pre-train, fine-tune, evaluate), then the results;
* :mod:`.tables`, :mod:`.results`, :mod:`.papers` -- aggregates and gains paired by seed; the tables and CSV of a
  grid; our gains beside the papers'; :mod:`.dice_plot` -- its Dice-against-L plot;
* :mod:`.figures`, :mod:`.curves`, :mod:`.tsne`, :mod:`.overlays`, :mod:`.pictures` -- the figures of a grid;
* :mod:`.compare` -- stores side by side; :mod:`.cards` -- the model cards' results blocks;
* :mod:`.probe_grid`, :mod:`.probe_results` -- representation probes of many encoders and their table;
* :mod:`.joint_optimum` -- the joint optimum of the image-wise terms, drawn in the pre-training curves.

The grammar of a row name (``<bundle>[/<variant>][+<add-on>][@<recipe>]``) is :mod:`metacontrast.method_name`
and where runs live :mod:`metacontrast.layout`, below this package.  Nothing is imported here, so that
importing one module does not load the others.
"""
