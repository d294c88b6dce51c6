"""Working with other tools: bags exported as CLAM/TRIDENT trees, milkit models inside torchmil."""
