"""The screens, one per module. Each lays out widgets and turns keys into calls on the app's `Workstation`
(`self.ws`); state and logic live in the plain classes of bcdtui.workstation / runs / runner / tailer / diff /
recipes. Styles are in bcdtui/bcdtui.tcss. Screens do not open one another, apart from the dialogs they own:
they post OpenRun / OpenComparison and the app opens the screen."""
from bcdtui.screens.annotate import AnnotateScreen
from bcdtui.screens.base import ChartAxes, OpenComparison, OpenRun, WsScreen
from bcdtui.screens.cluster import ClusterScreen
from bcdtui.screens.compare import CompareScreen
from bcdtui.screens.dialogs import ConfirmScreen, HelpScreen, PromptScreen
from bcdtui.screens.launch import LaunchScreen
from bcdtui.screens.log import LogScreen
from bcdtui.screens.recipes import RecipesScreen
from bcdtui.screens.run import RunScreen
from bcdtui.screens.runs import RunsScreen

__all__ = ["AnnotateScreen", "ChartAxes", "ClusterScreen", "CompareScreen", "ConfirmScreen", "HelpScreen", "LaunchScreen",
           "LogScreen", "OpenComparison", "OpenRun",
           "PromptScreen", "RecipesScreen", "RunScreen", "RunsScreen", "WsScreen"]
