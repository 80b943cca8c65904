"""SuperSimpleNet: surface-defect detection model, training and metrics."""
