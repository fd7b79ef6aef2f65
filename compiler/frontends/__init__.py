"""Front-ends: loaders read model files into a `Model`; importers turn a `Model` into the graph IR."""
