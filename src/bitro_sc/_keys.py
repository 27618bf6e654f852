"""Every default element, table, column, layer and coordinate-system name, in one place.

All of these are defaults: every public function takes the key as an argument.
Lengths are in µm unless a name ends in ``_px``.
"""

from __future__ import annotations

# --- coordinate systems -------------------------------------------------------------------
#: pixel coordinates of the (full-resolution level of the) H&E image
PIXEL_CS = "global"
#: physical coordinates in micrometres; every element of a slide carries a transformation to it.
#: The scale of an image's transformation to this system *is* its pixel size (µm/px).
MICRON_CS = "um"

# --- elements -------------------------------------------------------------------------------
IMAGE = "he"  # image element written by every reader and by `datasets.synthetic`
SPOTS = "spots"  # shapes: circles, radius in pixels of the image
TABLE = "table"  # spot expression table, annotates SPOTS
BULK = "bulk"  # one row per slide
CELLS = "cells"  # table of segmented cells (annotates CELL_SHAPES)
#: shapes element of segmented cells (circles). spatialdata >= 0.7 forbids a shapes element and a
#: table of the same name, so the shapes cannot also be called "cells".
CELL_SHAPES = "cell_circles"
CELL_LABELS = "cell_labels"  # labels element (nucleus label image)
TISSUE = "tissue"  # shapes element (polygons) of the tissue mask

# --- obs columns ----------------------------------------------------------------------------
SPOT_ID = "spot_id"  # instance key of the spot table; also cell -> spot assignment
CELL_ID = "cell_id"  # instance key of the cells table (== label value)
REGION = "region"  # region key of annotating tables
SAMPLE_ID = "sample_id"
PATIENT_ID = "patient_id"
IN_TISSUE = "in_tissue"
X_PX, Y_PX = "x_px", "y_px"  # centroid in image pixels
X_UM, Y_UM = "x_um", "y_um"  # centroid in µm
AREA_UM2 = "area_um2"
PHENOTYPE = "bitro_phenotype"

# --- obsm / obsp / layers / uns -------------------------------------------------------------
SPATIAL = "spatial"  # obsm: centre (x, y) in image pixels on every table (squidpy); µm in obs x_um / y_um
FEATURES = "X_bitro"  # obsm of the cells table, float32
FEATURES_PARAMS = "bitro_features"  # uns of the cells table
PHENOTYPE_PARAMS = "bitro_phenotype"  # uns of the cells table
ASSIGN_PARAMS = "bitro_assign"  # uns of the cells table: cell -> spot assignment record
CONNECTIVITIES = "spatial_connectivities"  # squidpy's key
DISTANCES = "spatial_distances"  # squidpy's key
GRAPH_PARAMS = "spatial_neighbors"  # squidpy's uns key
COUNTS_LAYER = "counts"
PREDICTION = "bitro"  # layer of spot / bulk / cell tables
RUN = "bitro"  # uns: config, genes, split, metrics, history

# --- levels ---------------------------------------------------------------------------------
#: levels a model is trained at (spot table targets, bulk table targets)
FIT_LEVELS: tuple[str, ...] = ("spot", "bulk")
#: levels a model predicts at
PREDICT_LEVELS: tuple[str, ...] = ("spot", "bulk", "cell")
#: sample id given to a slide whose identity is unknown, from its position ``i`` in a list
FALLBACK_SAMPLE = "slide_{i}"

# --- SpatialData.attrs ----------------------------------------------------------------------
#: ``sdata.attrs[ATTRS]`` holds slide-level metadata: sample_id, patient_id, and per image the
#: pixel size provenance ("mpp_source": "metadata" | "user" | "estimated ..." ).
ATTRS = "bitro_sc"

#: environment variable pointing at the shared real data (tests and benchmarks)
DATA_ENV = "BITRO_SC_DATA"
