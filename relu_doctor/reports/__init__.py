"""Presentation: TensorBoard, plots and the HTML report. Reads run records only: it never
touches a model, a hook or a device tensor."""
