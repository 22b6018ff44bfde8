"""torch.library operators, one file per kernel family: schema, fake kernel and autograd
formula, dispatching to the chosen backend's launcher."""
