"""Vector search: distances, exact KNN, KMeans, IVF approximate search."""
