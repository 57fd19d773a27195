"""The three pipeline stages (encoder, decoder, categorizer), the gateway, and the drivers that chain them."""
