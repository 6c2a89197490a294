"""refnet.validation: one script per paper table, figure or theory check.

Installed as ``refnet.validation`` (the folder is ``validation/`` in the repository). Each script
has ``main(argv=None) -> int`` and the flags ``--quick``, ``--tiny``, ``--seed``, ``--engine``,
``--data``, ``--data-dir``, ``--out``; ``refnet reproduce`` runs them and writes a summary.
"""

#: script name -> one-line description, in the order ``refnet reproduce`` runs them
SCRIPTS = {
    "theory": "theory checks against closed forms (random matrices, mean field, Proposition 1)",
    "sg_gamma": "SPP table: SG(gamma) init, JSV statistics, layer sparsity and error after CS pruning",
    "trainability": "SPP figure: JSV mean vs sparsity for VS-CS, LDI-CS, LDI-CS-AI, LDI-Rand; loss curves",
    "linear_vs_tanh": "SPP figure: per-layer connection sensitivity and mask, linear vs tanh",
    "unsupervised": "SPP table: unsupervised pruning (GT, Pred.(raw), Pred.(softmax), Unif.) for K = 3, 5, 7",
    "lenet": "SNIP: LeNet-300-100 at 95% and 98% sparsity and the first-layer mask picture",
    "second_order": "SNIP's table: OBD and L-OBS (pretrained) beside SNIP on LeNet-300-100; GraSP beside SNIP, SynFlow",
    "modern_networks": "SPP table: modern networks (ResNet-32, VGG-16): orthogonality score and error after CS pruning, VS-L/G/H, LDI, LDI-AI",
    "orthp": "[DI]: MLP-7-linear, L1 neuron pruning, JSV and accuracy vs fine-tuning lr with and without OrthP",
}
