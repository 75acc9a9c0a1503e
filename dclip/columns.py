"""The names of the data columns and batch keys that the collators, the teacher-target passes and the trainer share.

One place for them, so that a column written by one room (a `datasets.map` pass, a collator) is read under the same
name by the next (the trainer), and none of these modules has to import another for a name.
"""

from __future__ import annotations


# a captioned image, as every loader and the embedded scenes give it
IMAGE = "image"
CAPTION = "caption"
BOXES = "boxes"  # optional: annotated regions, normalised (x1, y1, x2, y2)
SPANS = "spans"  # optional: annotated phrases of the caption
IMAGE_ID = "image_id"  # optional: rows of the same image (a COCO image's five captions) share it
SAMPLE_ID = "sample_id"  # a row's position in the data its teacher targets were computed on (`dclip.shards`)
ROW_COLUMNS = (CAPTION, IMAGE, BOXES, SPANS)
# optional: generated hard-negative captions of each row (a list of strings), and the kind of each (e.g.
# `swap_attribute`), for hard-negative accuracy and the teacher's caption negatives
HARD_NEGATIVES = "hard_negatives"
HARD_NEGATIVE_TYPES = "hard_negative_types"

# what the student (any CLIP) takes
STUDENT_INPUTS = ("input_ids", "attention_mask", "pixel_values")

# what the DCLIP teacher takes besides the student's inputs: its regions and caption spans
TEACHER_REGION_INPUTS = (
    "region_pixel_values", "region_boxes", "region_mask", "span_input_ids", "span_attention_mask", "span_mask",
)

# the DCLIP teacher's text side (`DCLIPTeacherModel.encode_text_side`): a caption and its spans
TEACHER_TEXT_SIDE_INPUTS = ("input_ids", "attention_mask", "span_input_ids", "span_attention_mask", "span_mask")

# an online teacher's own inputs (its processor's pixels and token ids, and for a DCLIP teacher its regions and
# spans), nested under one batch key so that they never mix with the student's
TEACHER_INPUTS = "teacher_inputs"

# the teacher's enriched embeddings, precomputed once as columns or computed per batch (online teacher)
TEACHER_IMAGE_EMBEDS = "teacher_image_embeds"
TEACHER_TEXT_EMBEDS = "teacher_text_embeds"
TEACHER_TARGETS = (TEACHER_IMAGE_EMBEDS, TEACHER_TEXT_EMBEDS)

# the teacher towers' outputs, cached while the towers are frozen so that only the fusion block runs
REGION_FEATURE_COLUMNS = ("region_features", "region_boxes", "region_mask")
TEACHER_FEATURE_COLUMNS = (
    "image_global_features", *REGION_FEATURE_COLUMNS,
    "text_global_features", "span_features", "span_mask",
)
TEACHER_FEATURE_MASKS = ("region_mask", "span_mask")
# each caption's own hard negatives through the teacher's text tower (`--teacher_caption_negatives`)
NEGATIVE_FEATURE_COLUMNS = ("negative_text_global_features", "negative_span_features", "negative_span_mask",
                            "negative_mask")
NEGATIVE_FEATURE_MASKS = ("negative_span_mask", "negative_mask")

# CLIP-CID: each row's cluster among the k-means centres of the teacher's image embeddings
CLUSTER_LABELS = "cluster_labels"
