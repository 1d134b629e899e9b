"""Data: raw releases -> prepared datasets (`hiposeg prepare`), and loading them for training.

    registry.py     the sources `hiposeg prepare` knows (one converter module per release)
    sources.py      what a converter is: `Source`, `Item`, discovery helpers, label readers
    cityscapes.py ade20k.py mapillary.py pascal_part.py folder.py   the converters
    options.py      the flags of the `prepare` sub-commands, declared as data
    prepare.py      the driver: check, convert, journal, manifest
    convert.py      the per-item work in the worker processes
    pool.py         worker pool + progress bar
    journal.py      the resumable journal
    manifest.py     manifest.json: build, recognise, print
    output.py       the output folder: whose it is, what hiposeg wrote there
    layout.py       the prepared format's paths and plain-name checks
    codecs.py       PNG/JPEG decoding and checks, the pixel limit, label reading, PNG encoding
    headers.py      image sizes from file headers (PNG, JPEG, BMP, TIFF, WebP, PNM)
    synthetic.py    the built-in synthetic set
    dataset.py transforms.py   loading a prepared dataset for training and evaluation

The prepared format is described in README "Preparing data". Nothing is imported here, so loading
a prepared dataset does not import the converters.
"""
