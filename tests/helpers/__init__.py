"""What tests share: the one home for helpers (no test module imports another).

* ``cli``: running ``kdl`` in this interpreter or as a real process, and finding artifacts;
* ``configs``: composing the shipped configs; ``losses``: the shipped loss terms;
* ``training``: a few optimizer steps outside a Trainer; ``tokenizers``: two tiny tokenizers of other
  families; ``assets``: whether the shipped model and data are set up.
"""
