"""The data manifold's geometry as a learned decoder sees it (pure torch).

=============  ===========================================================================================
tangent        decoder Jacobians by batched forward mode; orthonormal tangent bases; :func:`tangent_subspace`
subspace       :class:`Subspace`: split d = d_in + d_out for per-sample bases, and the attacks' projector
matrix_free    :class:`MatrixFreeTangent`: the same without the Jacobian (CGLS), for ImageNet-sized decoders
random         the null models: random k-dim subspaces, anywhere or on an image's own pixels
projection     :func:`project_to_manifold`: the latent whose decoding is nearest an image (Levenberg–Marquardt)
exact          :class:`ExactManifold`: a generator and its exact inverse on its own images, as an autoencoder
=============  ===========================================================================================
"""

from dmm.manifold.exact import ExactEncoder, ExactManifold
from dmm.manifold.matrix_free import MatrixFreeTangent, ProjectionSolve, project_tangent
from dmm.manifold.projection import project_to_manifold
from dmm.manifold.random import (
    active_pixels,
    random_basis,
    random_fraction_mean,
    random_subspace_fraction,
    support_basis,
)
from dmm.manifold.subspace import Subspace, decompose, on_fraction, principal_angles
from dmm.manifold.tangent import (
    DENSE_LIMIT,
    TangentSpace,
    decoder_jacobian,
    orthonormalize,
    tangent_basis,
    tangent_space,
    tangent_subspace,
)

__all__ = [
    "DENSE_LIMIT",
    "ExactEncoder",
    "ExactManifold",
    "MatrixFreeTangent",
    "ProjectionSolve",
    "Subspace",
    "TangentSpace",
    "active_pixels",
    "decoder_jacobian",
    "decompose",
    "on_fraction",
    "orthonormalize",
    "principal_angles",
    "project_to_manifold",
    "project_tangent",
    "random_basis",
    "random_fraction_mean",
    "random_subspace_fraction",
    "support_basis",
    "tangent_basis",
    "tangent_space",
    "tangent_subspace",
]
